"""Where a session's gallery lives: ``<session outputs>/gallery/index.html``. The page's writer (``page``) and the
read-only server (``server``) both read it from here, so that the server starts without the imaging libraries."""

GALLERY_DIR = "gallery"
INDEX_NAME = "index.html"
