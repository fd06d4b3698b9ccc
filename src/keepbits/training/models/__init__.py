"""Model definitions; each module registers its builders in :mod:`keepbits.registry`."""
