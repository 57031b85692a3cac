"""Malaria cell screening: the library under the dashboard and the ``malaria`` command.

Layers, each importing only those below it (``make lint`` checks it; docs/architecture.md):
cli > training > evaluation > explain | smear > inference > nets > data > schema.
"""
