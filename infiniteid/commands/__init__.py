"""CLI sub-commands; each module has ``register(subparsers)`` that sets ``run`` as the parser default."""
