"""The `distillm` trainer: DistiLLM on Hugging Face models and data sets, on top of the library.

Config, models, data, batch sources (data set, on-policy and adaptive student outputs),
trainer, checkpoints, distributed helpers, evaluation, plots and the CLI. It needs the
`[train]` extra (`pip install 'distillm_ext[train]'`); the library (`distillm_ext`) does not,
and never imports this package.
"""
