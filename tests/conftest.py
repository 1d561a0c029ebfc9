"""The place for fixtures that several test modules share; plain builder functions live in builders.py.

Every fixture in use today belongs to one module and stays there. This file
also makes pytest (rootdir-relative "prepend" import mode) put this folder on
``sys.path``, so a test module in any subfolder can ``from builders import ...``.
"""
