"""Annotators: ``segment/`` (where masks and boxes come from), ``caption/`` (where texts and tags
come from, with the caption-program engine and its model backends), ``serving/`` (model servers
and models shared per machine). ``base`` holds the two roles and their data, ``registry`` the
names configs use, ``devices`` where a model runs.
"""
