"""The accuracy testbed: `scenes` (the synthetic task: scenes of coloured shapes and one-word questions), `train`
(`python -m llava_ivtp.testbed.train`: the shipped `models/llava-ivtp-testbed`) and `export`
(`llava-ivtp export-testbed`: its questions as files and an lmms-eval task)."""
