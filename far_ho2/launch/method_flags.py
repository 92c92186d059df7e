"""The launchers' ``--method`` and method settings, from the registry (``far_ho2.registry``):
``--method`` chooses among the methods registered when the flags are defined, and each setting
of each method is one flag (``--<method>_<setting>`` unless the setting names its flag) with the
registry's help and default, or the experiment's default (``defaults``).

A setting flag given explicitly for another method than ``--method`` is an error, and so is a
value outside the setting's range; both name the flag (``settings_from_flags``).
"""

from typing import Any, Mapping, Optional

from absl import flags

import far_ho2 as far


def define_flags(flag_values: flags.FlagValues, *, method_help: str, default: str = "reverse",
                 defaults: Optional[Mapping[str, Mapping[str, Any]]] = None) -> dict[str, flags.FlagHolder]:
    """Defines ``--method`` (``default``) and the settings' flags in ``flag_values``;
    ``defaults[method][setting]`` overrides a registry default (an experiment's values).

    Returns:
        The holders by flag name: ``method`` and every setting's flag.
    """
    into = {"flag_values": flag_values}
    holders = {"method": flags.DEFINE_enum("method", default, list(far.methods()), method_help, **into)}
    for name in far.methods():
        method = far.registry.get_method(name)
        values = method.defaults((defaults or {}).get(name))
        for setting in method.settings:
            flag = method.flag(setting)
            value = values[setting.name]
            help_ = f"{name}: {setting.help}"
            if setting.type is bool:
                holders[flag] = flags.DEFINE_boolean(flag, value, help_, **into)
            elif setting.type is int:
                holders[flag] = flags.DEFINE_integer(flag, value, help_, **into)
            elif setting.type is float:
                holders[flag] = flags.DEFINE_float(flag, value, help_, **into)
            elif setting.choices is not None:
                holders[flag] = flags.DEFINE_enum(flag, value, list(setting.choices), help_, **into)
            else:
                holders[flag] = flags.DEFINE_string(flag, value, help_, **into)
    return holders


def settings_from_flags(holders: Mapping[str, flags.FlagHolder]) -> dict[str, Any]:
    """The settings of ``--method`` from its flags (setting name -> value; None where a flag is
    left at a None default: the experiment's default).

    Raises:
        ValueError: for a setting flag of another method given on the command line, or a value
            outside its setting's range, naming the flag.
    """
    chosen = holders["method"].value
    for name in far.methods():
        method = far.registry.get_method(name)
        for setting in method.settings:
            flag = method.flag(setting)
            if name != chosen and flag in holders and holders[flag].present:
                raise ValueError(f"--{flag} is a setting of --method={name}; this run uses --method={chosen}.")
    method = far.registry.get_method(chosen)
    values = {}
    for setting in method.settings:
        value = holders[method.flag(setting)].value
        values[setting.name] = None if value is None else setting.check(value, f"--{method.flag(setting)}")
    return values
