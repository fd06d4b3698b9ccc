"""Training (torch): classifiers, NICE mask generators, SimpleBits simplifiers, density models.

Importing this package imports torch; the runtime (``keepbits``) never does.
"""
