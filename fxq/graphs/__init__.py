"""The torch.fx graph and what is recorded on it: records, canonical forms, sizes, the pass
context, integer modules, the float twin, outputs, recorded runs and graph dumps.
"""
