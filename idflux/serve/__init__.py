"""``idflux serve``: a Gradio page to place identities (upload faces, draw one box each, generate).

:mod:`idflux.serve.layout` holds the page's rules as plain functions; :mod:`idflux.serve.app` the
page (:class:`~idflux.serve.app.LayoutServer`) and the ``idflux serve`` command. Gradio is imported
only when the page is built (``pip install 'idflux[serve]'``).
"""
