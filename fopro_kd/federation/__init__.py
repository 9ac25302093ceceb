"""The federation protocol layer: what the ServerApp and the ClientApp agree on, in one Flower-free place.

``client/`` and ``server/`` import from here and never from each other (checked by
``tests/test_import_structure.py``): the keys of every message, node config and run config
(:mod:`~fopro_kd.federation.wire`), where each hospital's data comes from
(:mod:`~fopro_kd.federation.sites`), how a global student is built and scored
(:mod:`~fopro_kd.federation.evaluation`), the FedMAS robust factor both sides compute
(:mod:`~fopro_kd.federation.fedmas`), what a strategy needs from the clients
(:mod:`~fopro_kd.federation.strategies`) and how an error reason is made fit to leave a
hospital (:mod:`~fopro_kd.federation.errors`). Flower's records are converted at the apps'
boundary; nothing here imports ``flwr``.
"""
