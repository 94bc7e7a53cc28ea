"""reflora's tooling: the ``reflora`` console script and one module per command (the tools level).

Nothing outside ``reflora/tools`` imports this package (the console-script entry point and the tests aside): the
spec (``reflora/*.py``, ``reflora/ops``), the fixtures (``reflora/golden``) and the suite (``conformance``) stand
without it.

* ``reflora.tools.cli``: the console script (``reflora``, or ``python -m reflora.tools``); ``SUBCOMMANDS``
* ``reflora.tools.errors``: how every command fails (one line, exit codes, Ctrl-C/SIGTERM, output-path checks)
* ``reflora.tools.inspect``: ``reflora inspect``, parameter counts and LoRA tensor shapes from shapes alone
* ``reflora.tools.golden``: ``reflora golden generate|verify``
* ``reflora.tools.merge``: ``reflora merge``, merge_and_unload PEFT adapter folders into a GPT-2 folder
* ``reflora.tools.conform``, ``reflora.tools.matrix``: ``reflora conform``, ``reflora matrix`` (the conformance suite)
* ``reflora.tools.bench``, ``reflora.tools.bench_worker``: ``reflora bench`` and the process that measures
* ``reflora.tools.train``, ``reflora.tools.data``: ``reflora train`` and its byte tokenizer and corpora
* ``reflora.tools.experiment``: ``reflora experiment why-lora`` (``run``: the runs; ``analysis``: the numbers;
  ``report``: the page)
* ``reflora.tools.trajectory``: ``reflora trajectory generate|verify``
"""
