"""One module per LMDeploy module hooked, named after it; each declares its
hooks (hook.wrap, or an import hook of its own where fields are added) and
calls down into the tier's layers. No hook module imports another; none
imports LMDeploy, torch or numpy at module level (they are imported at every
interpreter start by registry.py, whose HOOK_MODULES lists them)."""
