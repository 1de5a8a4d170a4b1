"""geomap: the journey of an inference token through a real language model, measured and stored.

Stages, each a subpackage with plain data at its boundary:
``models`` (load a causal LM and know its architecture) → ``capture`` (one forward pass → `Journey`
records of numpy arrays) → later ``store``, ``analysis`` and ``report``; ``cli`` is a thin layer on top.
"""

__version__ = "0.1.0"
