"""Model serving: a model server started, watched and always stopped by the pipeline
(``managed_server``, with its process groups and records in ``processes``), and one server or
loaded model per machine for all SDK processes (``shared``).
"""
