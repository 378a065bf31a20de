"""The Lightning plugin and callback, for both package families (``lightning.pytorch`` and
``pytorch_lightning``). Public entry points: :mod:`asyncckpt.lightning` and
:mod:`asyncckpt.pytorch_lightning`, which define the classes over the mixins here. Nothing in this
package imports Lightning at import time; :class:`.family.Family` does, when a public module is
imported."""
