"""N-way, federated and decentralized recipes built on :func:`mergekit_vision.merge_many`.

``recipes.flower`` (Flower >= 1.42 Message API) needs the optional extra: ``pip install "mergekit-vision[federated]"``.
``recipes.federated`` holds the framework-free pieces the example scripts share (Dirichlet splits,
local training, gossip).
"""
