"""The on-disk format of a RevModel directory, below :mod:`revffn_fx.model` (which saves
and reloads itself through it): the layout and the ``revffn`` config section
(:mod:`.layout`), the safetensors shards and their sha256 record
(:mod:`.checkpoint_files`), writing a RevModel (:mod:`.saving`) and rebuilding one
(:mod:`.rebuilding`). The public entry points are in :mod:`revffn_fx.export`."""
