"""Applications built on arrayquant: the command line, the demo, models and plotting.

The library never imports this package; it sits on top of it.
"""
