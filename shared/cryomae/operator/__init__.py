"""The operator's side: the ``cryomae`` command line (``cli``), the offline workflows (``workflows``: train and
pick files without the services), the operator actions on a running installation (``actions``), how they reach
the services (``control``) and the demo session (``demo``). Operator code may use the services' modules; the
services never import this package (``tests/unit/test_layout.py``).
"""
