//! flowgate inside Mosquitto 2.1: share mode as a broker plugin.
//!
//! ```text
//! plugin /path/to/libflowgate_mosquitto.so
//! plugin_opt_config /path/to/flowgate.toml
//! ```
//!
//! This file is the C boundary: Mosquitto's entry points and event callbacks,
//! each of which turns the event's C data into Rust values, calls
//! [`plugin::Plugin`], and writes the answer back. No panic crosses it: every
//! callback runs under `catch_unwind`, logs a panic, and answers as if the
//! plugin were not there (or refuses the one connection it was about).

pub mod ffi;
pub mod plugin;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use flowgate::mqtt::codec::Protocol;

use ffi::*;
use plugin::{Auth, Plugin};

/// Writes `message` to Mosquitto's log, prefixed `flowgate:`.
fn log(level: c_int, message: &str) {
    let text = CString::new(format!("flowgate: {message}").replace('\0', " "))
        .unwrap_or_else(|_| c"flowgate: (unprintable log line)".to_owned());
    // SAFETY: a "%s" format with one NUL-terminated string argument.
    unsafe { mosquitto_log_printf(level, c"%s".as_ptr(), text.as_ptr()) };
}

/// Runs `f`, turning a panic into a log line and `on_panic`.
fn guarded<T>(what: &str, on_panic: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            log(
                MOSQ_LOG_ERR,
                &format!("{what}: {why} (caught; the broker goes on)"),
            );
            on_panic
        }
    }
}

/// # Safety
/// `p` is NULL or a NUL-terminated string that outlives the result.
unsafe fn text<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller's promise.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

/// The value of `plugin_opt_{key}` among `count` options.
///
/// # Safety
/// `options` points to `count` valid `mosquitto_opt`s (or is NULL).
unsafe fn option(options: *const Opt, count: c_int, key: &str) -> Option<PathBuf> {
    if options.is_null() {
        return None;
    }
    let count = usize::try_from(count).unwrap_or(0);
    // SAFETY: the caller's promise.
    let opts = unsafe { std::slice::from_raw_parts(options, count) };
    opts.iter().find_map(|o| {
        // SAFETY: Mosquitto's option strings are NUL-terminated.
        let (k, v) = unsafe { (text(o.key)?, text(o.value)?) };
        (k == key).then(|| PathBuf::from(v))
    })
}

/// The plugin, from the userdata Mosquitto hands back.
///
/// # Safety
/// `userdata` is the pointer `mosquitto_plugin_init` made, not yet freed.
unsafe fn state<'a>(userdata: *mut c_void) -> Option<&'a Plugin> {
    // SAFETY: the caller's promise.
    unsafe { (userdata as *const Plugin).as_ref() }
}

/// The events the plugin listens to, with their callback.
const EVENTS: &[(c_int, Callback)] = &[
    (MOSQ_EVT_BASIC_AUTH, on_basic_auth),
    (MOSQ_EVT_CONNECT, on_connect),
    (MOSQ_EVT_SUBSCRIBE, on_subscribe),
    (MOSQ_EVT_UNSUBSCRIBE, on_subscribe),
    (MOSQ_EVT_MESSAGE_IN, on_message),
    (MOSQ_EVT_MESSAGE_OUT, on_message),
    (MOSQ_EVT_DISCONNECT, on_disconnect),
    (MOSQ_EVT_CLIENT_OFFLINE, on_disconnect),
    (MOSQ_EVT_RELOAD, on_reload),
];

/// Plugin interface version 5 (Mosquitto 2.1).
///
/// # Safety
/// `versions` points to `count` ints (or is NULL).
#[no_mangle]
pub unsafe extern "C" fn mosquitto_plugin_version(count: c_int, versions: *const c_int) -> c_int {
    guarded("mosquitto_plugin_version", -1, || {
        if versions.is_null() {
            return -1;
        }
        // SAFETY: Mosquitto passes `count` supported versions.
        let versions =
            unsafe { std::slice::from_raw_parts(versions, usize::try_from(count).unwrap_or(0)) };
        if versions.contains(&PLUGIN_VERSION) {
            PLUGIN_VERSION
        } else {
            -1
        }
    })
}

/// Reads the config, starts the admin listener and registers the callbacks;
/// a non-zero answer makes Mosquitto refuse to start (the reason is logged).
///
/// # Safety
/// Called by Mosquitto as its plugin API says.
#[no_mangle]
pub unsafe extern "C" fn mosquitto_plugin_init(
    id: *mut PluginId,
    userdata: *mut *mut c_void,
    options: *mut Opt,
    option_count: c_int,
) -> c_int {
    guarded("plugin init", MOSQ_ERR_UNKNOWN, || {
        // SAFETY: the options array Mosquitto passes.
        let path = unsafe { option(options, option_count, "config") };
        let plugin = match Plugin::start(path.as_deref(), true) {
            Ok(p) => p,
            Err(e) => {
                for line in format!("cannot start: {e}").lines() {
                    log(MOSQ_LOG_ERR, line);
                }
                return MOSQ_ERR_UNKNOWN;
            }
        };
        if let Some(addr) = plugin.admin_addr() {
            log(
                MOSQ_LOG_NOTICE,
                &format!("admin listener on http://{addr} (/metrics, /api/instances, /healthz)"),
            );
        }
        let ptr = Box::into_raw(Box::new(plugin)).cast::<c_void>();
        // SAFETY: `userdata` is Mosquitto's slot for our pointer; `id` is ours.
        unsafe {
            *userdata = ptr;
            mosquitto_plugin_set_info(id, c"flowgate".as_ptr(), c"0.1.0".as_ptr());
            for &(event, cb) in EVENTS {
                let rc = mosquitto_callback_register(id, event, cb, std::ptr::null(), ptr);
                if rc != MOSQ_ERR_SUCCESS {
                    log(
                        MOSQ_LOG_ERR,
                        &format!("cannot register for event {event}: error {rc}"),
                    );
                    return rc;
                }
            }
        }
        MOSQ_ERR_SUCCESS
    })
}

/// Stops the admin listener and frees the state (Mosquitto unregisters the
/// callbacks itself).
///
/// # Safety
/// Called once by Mosquitto with the userdata of `mosquitto_plugin_init`.
#[no_mangle]
pub unsafe extern "C" fn mosquitto_plugin_cleanup(
    userdata: *mut c_void,
    _options: *mut Opt,
    _option_count: c_int,
) -> c_int {
    guarded("plugin cleanup", MOSQ_ERR_SUCCESS, || {
        if !userdata.is_null() {
            // SAFETY: made by Box::into_raw in init, freed only here.
            drop(unsafe { Box::from_raw(userdata.cast::<Plugin>()) });
        }
        MOSQ_ERR_SUCCESS
    })
}

unsafe extern "C" fn on_basic_auth(
    _event: c_int,
    data: *mut c_void,
    userdata: *mut c_void,
) -> c_int {
    guarded("basic auth", MOSQ_ERR_PLUGIN_IGNORE, || {
        // SAFETY: Mosquitto's event data for this event, and our userdata.
        let (Some(p), Some(ev)) = (unsafe { state(userdata) }, unsafe {
            data.cast::<EvtBasicAuth>().as_mut()
        }) else {
            return MOSQ_ERR_PLUGIN_IGNORE;
        };
        let client = ev.client;
        // SAFETY: the client of this event, alive during it.
        let (id, address, version) = unsafe {
            (
                text(mosquitto_client_id(client)).unwrap_or(""),
                text(mosquitto_client_address(client)).unwrap_or(""),
                mosquitto_client_protocol_version(client),
            )
        };
        // SAFETY: NUL-terminated or NULL.
        let username = unsafe { text(ev.username) };
        let protocol = match version {
            5 => Protocol::V5,
            3 => Protocol::V31,
            _ => Protocol::V311,
        };
        match p.on_auth(client as usize, id, username, address, protocol) {
            // the other plugins and the password file decide as before
            Auth::Untouched => MOSQ_ERR_PLUGIN_IGNORE,
            Auth::Replica { client_id } => {
                let rc = CString::new(client_id)
                    // SAFETY: the client of this event; the id is copied by Mosquitto.
                    .map(|c| unsafe { mosquitto_set_clientid(client, c.as_ptr()) })
                    .unwrap_or(MOSQ_ERR_UNKNOWN);
                if rc == MOSQ_ERR_SUCCESS {
                    MOSQ_ERR_PLUGIN_IGNORE
                } else {
                    p.on_auth_failed(client as usize);
                    log(
                        MOSQ_LOG_WARNING,
                        &format!("replica {id}: cannot set its client id (error {rc}): refused"),
                    );
                    MOSQ_ERR_SERVER_BUSY
                }
            }
            Auth::Full { instance } => {
                log(
                    MOSQ_LOG_NOTICE,
                    &format!(
                        "replica {id} refused: instance {instance} has max_replicas connected"
                    ),
                );
                MOSQ_ERR_SERVER_BUSY
            }
        }
    })
}

unsafe extern "C" fn on_connect(_event: c_int, data: *mut c_void, userdata: *mut c_void) -> c_int {
    guarded("connect", MOSQ_ERR_SUCCESS, || {
        // SAFETY: Mosquitto's event data for this event, and our userdata.
        if let (Some(p), Some(ev)) = (unsafe { state(userdata) }, unsafe {
            data.cast::<EvtConnect>().as_ref()
        }) {
            p.on_connect(ev.client as usize);
        }
        MOSQ_ERR_SUCCESS
    })
}

unsafe extern "C" fn on_disconnect(
    _event: c_int,
    data: *mut c_void,
    userdata: *mut c_void,
) -> c_int {
    guarded("disconnect", MOSQ_ERR_SUCCESS, || {
        // SAFETY: Mosquitto's event data for this event, and our userdata.
        if let (Some(p), Some(ev)) = (unsafe { state(userdata) }, unsafe {
            data.cast::<EvtDisconnect>().as_ref()
        }) {
            p.on_disconnect(ev.client as usize);
        }
        MOSQ_ERR_SUCCESS
    })
}

/// SUBSCRIBE and UNSUBSCRIBE: a replica's filter becomes the shared one.
unsafe extern "C" fn on_subscribe(event: c_int, data: *mut c_void, userdata: *mut c_void) -> c_int {
    guarded("subscribe", MOSQ_ERR_SUCCESS, || {
        // SAFETY: Mosquitto's event data (subscribe and unsubscribe share a
        // layout), and our userdata.
        let (Some(p), Some(ev)) = (unsafe { state(userdata) }, unsafe {
            data.cast::<EvtSubscribe>().as_mut()
        }) else {
            return MOSQ_ERR_SUCCESS;
        };
        // SAFETY: NUL-terminated, owned by Mosquitto.
        let Some(filter) = (unsafe { text(ev.data.topic_filter) }) else {
            return MOSQ_ERR_SUCCESS;
        };
        let client = ev.client as usize;
        let (new, options) = if event == MOSQ_EVT_SUBSCRIBE {
            match p.on_subscribe(client, filter, ev.data.options) {
                Some((f, o)) => (f, o),
                None => return MOSQ_ERR_SUCCESS,
            }
        } else {
            match p.on_unsubscribe(client, filter) {
                Some(f) => (f, ev.data.options),
                None => return MOSQ_ERR_SUCCESS,
            }
        };
        let Ok(new) = CString::new(new) else {
            return MOSQ_ERR_SUCCESS;
        };
        // SAFETY: Mosquitto frees the old filter and, later, this one with
        // mosquitto_free: it must come from mosquitto_strdup.
        let copy = unsafe { mosquitto_strdup(new.as_ptr()) };
        if copy.is_null() {
            log(
                MOSQ_LOG_ERR,
                "out of memory rewriting a filter: the subscription is refused",
            );
            return MOSQ_ERR_UNKNOWN;
        }
        ev.data.topic_filter = copy;
        ev.data.options = options;
        MOSQ_ERR_SUCCESS
    })
}

/// MESSAGE_IN (a replica publishes) and MESSAGE_OUT (a replica is sent one).
unsafe extern "C" fn on_message(event: c_int, data: *mut c_void, userdata: *mut c_void) -> c_int {
    guarded("message", MOSQ_ERR_SUCCESS, || {
        // SAFETY: Mosquitto's event data for this event, and our userdata.
        if let (Some(p), Some(ev)) = (unsafe { state(userdata) }, unsafe {
            data.cast::<EvtMessage>().as_ref()
        }) {
            let bytes = || {
                let topic = if ev.topic.is_null() {
                    0
                } else {
                    // SAFETY: NUL-terminated, owned by Mosquitto.
                    unsafe { CStr::from_ptr(ev.topic) }.to_bytes().len()
                };
                topic + ev.payloadlen as usize
            };
            p.on_message(ev.client as usize, event == MOSQ_EVT_MESSAGE_IN, bytes);
        }
        MOSQ_ERR_SUCCESS
    })
}

/// SIGHUP: the TOML is read again; a bad one is logged and changes nothing.
unsafe extern "C" fn on_reload(_event: c_int, data: *mut c_void, userdata: *mut c_void) -> c_int {
    guarded("reload", MOSQ_ERR_SUCCESS, || {
        // SAFETY: Mosquitto's event data for this event, and our userdata.
        let (Some(p), Some(ev)) = (unsafe { state(userdata) }, unsafe {
            data.cast::<EvtReload>().as_ref()
        }) else {
            return MOSQ_ERR_SUCCESS;
        };
        // SAFETY: the options array of the reloaded configuration.
        let path = unsafe { option(ev.options, ev.option_count, "config") };
        match p.reload(path.as_deref()) {
            Ok(later) => {
                log(MOSQ_LOG_NOTICE, "config reloaded: match rules and broadcast filters apply to the next CONNECT and SUBSCRIBE");
                for l in later {
                    log(
                        MOSQ_LOG_WARNING,
                        &format!("not changed until a restart: {l}"),
                    );
                }
            }
            Err(e) => {
                for line in format!("reload refused, the running config stays: {e}").lines() {
                    log(MOSQ_LOG_ERR, line);
                }
            }
        }
        MOSQ_ERR_SUCCESS
    })
}
