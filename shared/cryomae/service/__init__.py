"""The live services, one module per process: ``watcher``, ``picker`` (with its model cache), ``writer`` and
``trainer``, each binding one handler to the broker (``cryomae.messaging``); ``app`` runs some or all of them
(``cryomae service NAME``, ``services/NAME.py`` and the ``cryomae-NAME`` console scripts start the same code;
``cryomae run`` starts all four in one process); ``handling`` is the per-message decoding and log line,
``metrics`` the Prometheus metrics and the health endpoint. Nothing here imports ``cryomae.operator``.
"""
