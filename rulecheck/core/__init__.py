"""The pure core: functions over tensors and plain values (no files, no printing).

``scores`` (attention and value scores in SAE space, candidates, ranking), ``rules``
(predictions of skip-gram disjunctions), ``gradient`` (gradient-based ranking), ``metrics``,
``exemplars`` (the evaluation protocol, streamed), ``evaluate`` (scoring rules on exemplars),
``heads`` (hook names, a head's weights, ``Probe``), ``modelview`` (what is read of a
HookedTransformer or a TransformerBridge), ``tokens`` (input features read as
tokens), ``counterfactuals`` (length-keeping edits), ``distractors`` and ``counts`` (the math of
absence and counting rules), ``extract`` (a head's rules from all of these) and ``matching``
(features of an old and a new SAE of the same hook).
"""
