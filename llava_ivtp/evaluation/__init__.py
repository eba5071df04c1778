"""Evaluation: `eval` (`llava-ivtp eval`), `show` (`llava-ivtp show`), the `evaluate` metric modules
`metric_exact_match` and `metric_vqa_accuracy` (loaded by path), and lmms-eval's `llava_ivtp` model
(`lmms_eval_model`) with the functions of the exported testbed task (`lmms_task_utils`)."""
