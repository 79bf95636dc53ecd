"""The model side of dvi, usable alone (a notebook, one process): no Ray, Redis or DeepSpeed here.

The modules, by what they are about:

- the model, split:   model (load, built-in SmolLM2), split (trunk + verifier), kv_cache, lean_layers,
                      small_batch_linear, step_costs (what a pass costs, which kernel is faster)
- decoding:           engine (the speculative round), acceptance (verification rules), length_policy,
                      copy_sources (where copied drafts come from: ngram, the request's own text, and
                      suffix_index, the traffic memory; proposal, what they offer, no torch), batching,
                      loading (model + head + policy from names), defaults
- the drafter head:   drafter (DrafterHead, save/load), transitions (the Transition record)
- learning:           objectives (losses, schedule, train_step), greedy_paths (exact simulation along
                      greedy paths), path_cache, online (the in-process loop)
- workloads:          prompts (built-in, Spec-Bench, HumanEval), synthetic_prompts, datasets (the registry
                      `dvi data fetch` downloads from: Spec-Bench), cache (cache_dir, no torch)
- results:            versions (the package versions every bench and run JSON records, no torch)
"""
