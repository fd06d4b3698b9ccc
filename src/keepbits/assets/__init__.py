"""Small files shipped with keepbits: a tiny MNIST sample, the demo bundle."""
