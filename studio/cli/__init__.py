"""The `artifact-studio` command (`main`: parser and dispatch; `common`: services for one command and
shared helpers; `data`, `synth`, `train`: the command families). A thin layer over engines + store.

May import: any studio package except studio.web; the heavy engines only inside the command that uses them.
"""
