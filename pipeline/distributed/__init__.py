"""Everything that knows about ranks: which launcher started the process and where it sits
(``launcher``), joining and leaving the job (``job``), the DeepSpeed dict (``ds_config``) and
engine (``engine``), the private DeepSpeed attributes we touch (``ds_internals``), and MegDet's
cross-GPU BatchNorm over BN groups (``norm``)."""
