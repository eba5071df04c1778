"""llava-ivtp's tools: everything of the project that is not the model.

The model -- configuration, processor, modeling code and the pruning methods -- is the package
`modeling_llava_ivtp`, whose files a converted checkpoint carries as its remote code. The tools below are installed
with the project (`pip install llava-ivtp`) and are never copied into a checkpoint; they import the model package,
never the reverse.

- `llava_ivtp.cli`: the `llava-ivtp` command (`convert`, `flops`, `bench`, `eval`, `show`, `export-testbed`) and
  the checks its subcommands share: output paths (`prepare_output`), checkpoint arguments (`resolve_checkpoint`,
  `load_ivtp_checkpoint`), the one-line error report (`report_error`).
- `llava_ivtp.conversion`: `convert`, a stock llava-hf checkpoint + its open_clip CLIP -> an IVTP checkpoint
  (`llava-ivtp convert`), and `push_to_hub`.
- `llava_ivtp.measuring`: `flops` (FLOPs counted on the real forward, `llava-ivtp flops`), `analytic_flops` (the
  closed-form counts the presets were chosen with), `bench` (latency and memory, `llava-ivtp bench`).
- `llava_ivtp.evaluation`: `eval` (accuracy, TFLOPs and prefill time under a grid of pruning settings,
  `llava-ivtp eval`), `show` (the patches each setting keeps, `llava-ivtp show`), the `evaluate` metric modules
  `metric_exact_match` and `metric_vqa_accuracy` (loaded by path), and the lmms-eval model `lmms_eval_model`
  (`lmms-eval --model llava_ivtp`) with `lmms_task_utils` (the functions of the exported testbed task).
- `llava_ivtp.testbed`: the accuracy testbed -- `scenes` (the synthetic task), `train` (trains the shipped
  `models/llava-ivtp-testbed`), `export` (its questions as files and an lmms-eval task, `llava-ivtp export-testbed`).
"""
