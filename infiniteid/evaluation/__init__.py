"""Evaluation: how well a model keeps identity and follows the prompt, and the generated test world.

Map of the subpackage:

* :mod:`.world` - the procedural world (numpy + PIL): drawn people whose identity is a
  few visible attributes, in prompt-described scenes, with captions, and the
  attribute read-back that scores generated images;
* :mod:`.metrics` - CLIP-T and CLIP-I (a local CLIP folder), ArcFace face similarity
  through the face front end, the paper's table;
* :mod:`.harness` - identities x prompts on any backend (PyTorch reference or runtime),
  scored, written as JSON + Markdown + a contact sheet.

``infiniteid evaluate`` (:mod:`infiniteid.commands.evaluate`) is the command line.

Imports only downward: :mod:`infiniteid.model` or :mod:`infiniteid.runtime`, and
:mod:`infiniteid.face`.
"""
