"""The session gallery: pictures of micrographs with their picks (``render``), the self-contained page the writer
keeps beside a session's STAR files (``page``), and the read-only web server for it (``server``)."""
