"""lightning_vigu: a trainable Lightning implementation of Uni-ViGU (arXiv 2604.08121).

One diffusion transformer denoises video latents (continuous flow matching) and caption
tokens (discrete flow matching) in the same forward pass; caption tokens are routed to their
own FFN expert. See the README and ``../shared/DESIGN.md`` for the picture.

Time glossary (the one convention of this package)
--------------------------------------------------
* **Flow time** ``t`` in ``[0, 1]``: ``t = 0`` is the source (Gaussian noise for video, the
  uniform/mask source for captions), ``t = 1`` is data. Everything in :mod:`lightning_vigu.flows`,
  the samplers and the training losses speaks flow time, with the notation of the flow-matching
  literature: ``x_0`` source, ``x_1`` data, ``x_t`` on the path, ``kappa_t`` the discrete
  scheduler.
* **Noise level** ``sigma = 1 - t`` and the **generator timestep** ``1000 * sigma`` are Wan's
  convention. The transformer (:mod:`lightning_vigu.model`) takes generator timesteps, exactly
  like diffusers' ``WanTransformer3DModel``, and predicts Wan's velocity ``u = eps - x_data``,
  which is ``-dx_t/dt``.

The conversion between the two happens in exactly one place,
:class:`lightning_vigu.flows.convention.FlowTimeModel`, which wraps the transformer so that the
flows see ``dx_t/dt`` as a function of flow time.
"""

__version__ = "0.1.0"
