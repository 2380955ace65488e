"""Evaluation: how well a model keeps identity and follows the prompt, and the generated test world.

Map of the subpackage:

* :mod:`.world` - the procedural world (numpy + PIL): drawn people whose identity is a
  few visible attributes, in prompt-described scenes, with captions, and the
  attribute read-back that scores generated images;

Imports only downward: :mod:`infiniteid.model` or :mod:`infiniteid.runtime`, and
:mod:`infiniteid.face`.
"""
