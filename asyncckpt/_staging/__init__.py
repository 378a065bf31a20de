"""Staging: where a byte is copied (live tensors into reusable host memory, before the writer).

The modules, in the order a save goes through them: ``skeleton`` (the one pickling pass),
``layout`` (where each storage goes in a slot), ``eager`` and ``lazy`` (the two stagers, one
``Stager`` protocol in ``protocol``), ``copier`` (host copies), ``devices`` (the CUDA side
stream and the XLA transfer), ``arena`` (slot memory).
"""
