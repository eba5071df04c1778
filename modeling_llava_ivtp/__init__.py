"""llava-ivtp: Instruction-guided Visual Token Pruning (IVTP) for LLaVA-1.5 and LLaVA-NeXT, native to Hugging Face
transformers."""

from .configuration_llava_ivtp import SUPPORTED_TRANSFORMERS, IvtpConfig, IvtpNextConfig
from .cache_ivtp import IvtpCache, IvtpStaticCache
from .modeling_llava_ivtp import IvtpCausalLMOutputWithPast, LlavaIvtpForConditionalGeneration
from .modeling_llava_next_ivtp import LlavaNextIvtpForConditionalGeneration
from .processing_llava_ivtp import LlavaIvtpProcessor, LlavaNextIvtpProcessor


__version__ = "0.1.0"

__all__ = [
    "IvtpCache",
    "IvtpCausalLMOutputWithPast",
    "IvtpConfig",
    "IvtpNextConfig",
    "IvtpStaticCache",
    "LlavaIvtpForConditionalGeneration",
    "LlavaIvtpProcessor",
    "LlavaNextIvtpForConditionalGeneration",
    "LlavaNextIvtpProcessor",
    "SUPPORTED_TRANSFORMERS",
]
