"""The ID module kinds by name (torch-free, so the command line can list them without loading torch).

An adapter file's header names its kind; :mod:`infiniteid.model.id_encoder` maps each
name to its mapper class, :mod:`infiniteid.model.public_adapter` reads the published
files of the ``ip-adapter-*`` kinds.
"""
INFINITEID = "infiniteid"
PLUS_FACE = "ip-adapter-plus-face"
FACEID_PLUSV2 = "ip-adapter-faceid-plusv2"
FACEID_PLUS = "ip-adapter-faceid-plus"
FACEID = "ip-adapter-faceid"

PUBLIC_KINDS = (PLUS_FACE, FACEID_PLUSV2, FACEID_PLUS, FACEID)
AUTO = "auto"  # read the kind from the file
