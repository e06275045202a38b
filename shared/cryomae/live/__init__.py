"""The live services' handlers: decode a message, call the library, publish the result.

Each service here binds one handler to the broker (``cryomae.messaging``); the processes are started by
``cryomae service NAME`` (``services/``) or all together by ``cryomae run``.
"""
