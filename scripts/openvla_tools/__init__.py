"""The library that this repository's command-line programs (`scripts/*.py`) share: the simulated environments and
their scripted demonstrations (`envs`), closed-loop evaluation, the vision pretraining stage, dataset readers and
writers, model cards and serving. The model itself is not here: it is the three top-level modules
(`configuration_openvla`, `modeling_openvla`, `processing_openvla`), which are also the Hub remote code."""
