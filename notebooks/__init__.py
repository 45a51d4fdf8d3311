"""The Jupyter notebooks, shipped as package data: ``vsmtrace notebooks --copy DIR`` copies them out."""
