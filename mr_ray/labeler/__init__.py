"""The LLM judge: guideline prompt, fine-tune (Ray Train), batch labeling (Ray Data + vLLM), audit, synthetic queries."""
