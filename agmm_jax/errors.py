"""One-line messages for the mistakes a user makes on the command line.

absl and ml_collections report a bad ``--config.X`` as a chain of exceptions
(an unknown field is a ``KeyError`` inside an ``AttributeError``, 53 lines of
traceback; a config file that fails to load is a multi-line flags error with
the config's own traceback inside). ``flag_error_line`` reduces the chain to
the flag the user typed and what to do about it.
"""

from collections.abc import Sequence


def _chain(error: BaseException) -> list[BaseException]:
  """``error`` and its causes, outermost first."""
  chain = [error]
  while (chain[-1].__cause__ or chain[-1].__context__) is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  return chain


def _unknown_field(chain: list[BaseException]) -> tuple[str, str] | None:
  """``(field, did-you-mean hint)`` when the chain is ml_collections'
  unknown-field error, else None."""
  messages = [str(e.args[0]) for e in chain
              if isinstance(e, KeyError) and e.args]
  if not messages or not any(isinstance(e, AttributeError) for e in chain):
    return None
  field = messages[-1].strip('\'"')
  hints = [line.strip() for m in messages for line in m.splitlines()[1:]]
  return field, ' '.join(hints)


def _flag_name(argument: str) -> str:
  return argument.split('=', 1)[0]


def flag_error_line(error: BaseException, argv: Sequence[str]) -> str:
  """One line for a flags error: the flag as typed, the reason, what to do.

  Args:
    error: what absl's flag parsing (or the first read of ``--config``)
      raised.
    argv: the command line, to find the flag the user typed.
  """
  chain = _chain(error)
  unknown = _unknown_field(chain)
  if unknown is not None:
    field, hint = unknown
    typed = [_flag_name(a) for a in argv if a.startswith('--config.')
             and field in _flag_name(a).split('.')]
    flag = typed[0] if typed else f'--config.{field}'
    hint = f' ({hint})' if hint else ''
    return (f'{flag}: the config has no field {field!r}{hint}; the fields are '
            'those of configs/common.py (docs/design.md, "Config schema")')
  root = chain[-1]
  lines = [line.strip() for line in str(root).splitlines() if line.strip()]
  reason = lines[-1] if lines else type(root).__name__
  first = str(error).splitlines()[0] if str(error) else ''
  if first.startswith('flag --'):
    # absl names the flag and value: 'flag --config.x=abc: ...'.
    flag = first[len('flag '):].split(': ', 1)[0]
    return f'{flag}: {reason}'
  configs = [a for a in argv if a.startswith('--config=')]
  prefix = f'{configs[0]}: ' if configs else ''
  return f'{prefix}{reason}'
