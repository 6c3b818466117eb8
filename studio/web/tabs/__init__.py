"""One module per tab (`build(services, shared, tab)` plus named handler functions), the pieces every tab
uses (`common`), state shared between tabs (`label_screen`, `inspect_view`) and the classifier panels that
live inside other tabs (`classifier_panels`). A tab never imports another tab.
"""
