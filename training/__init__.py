"""Training: turns a dataset and a frozen backbone into a (pruned) E2VPT prompt set.

data (image folders, VTAB-1k list files, the generated mini-VTAB), trainer (the official recipe and the
baselines), pruning (importance, token/segment pruning, rewinding), report (JSON + plots), upstream (the
offline pretrained backbone), minivtab (generated downstream tasks), study (the fidelity study), cli.
"""
