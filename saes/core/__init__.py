"""The bottom layer of `saes`: the dictionaries and their maths, importing nothing else of `saes`.

`dictionary` (the abstract `Dictionary`, the `Replacement` interface), `files` (the generic readers: JSON,
safetensors, circuit-tracer's flat YAML, contained file entries), `sae` (the SAE architectures, one final
class each, registered in `ARCHS`; `check_arrays`), `cross_layer` (`CrossLayerTranscoder` and its maths),
`transcoders` (`TranscoderSet`: every MLP replaced), `evaluate` (splicing, CE loss recovered,
reconstruction metrics). No file format lives here: the formats are `saes.io`.
"""
