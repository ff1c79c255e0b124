"""Ray glue: prompt streaming (data), the worker loop (worker, engine), the trainer and its metrics, Tune.

Public entry points: ``dist.trainer.build_trainer``, ``export_result``, ``run_debias``; ``dist.data``
(prompt-set reading, mixing and streaming); ``dist.worker.Worker`` / ``train_loop``.
"""
