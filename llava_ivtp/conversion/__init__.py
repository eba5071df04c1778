"""Conversion: `convert` turns a stock llava-hf checkpoint and its open_clip CLIP into an IVTP checkpoint
(`llava-ivtp convert`) and publishes it (`push_to_hub`)."""
