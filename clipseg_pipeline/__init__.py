"""clipseg_pipeline: the library behind the pipeline's stages and tools.

What a CLIPSeg model is (architecture), how its original files are read (original, fetch, tokenizer), how their names
map onto the Hugging Face model's (name_map, hf_layout), an independent forward pass of the original (reference), how
a converted model is held to it (comparison), and how results are written (tensor_io, precision, hf_export,
model_card, pictures). The DVC stages in stages/ and the tools in tools/ are thin entry points over these modules.
"""
