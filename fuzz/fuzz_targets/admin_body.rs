//! An admin API request body: the input is `<METHOD> <path>`, a newline, then the body, so
//! one target covers every route (the corpus names its route on each file's first line).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(newline) = data.iter().position(|&b| b == b'\n') else {
        return;
    };
    let (route, body) = (&data[..newline], &data[newline + 1..]);
    let Ok(route) = std::str::from_utf8(route) else {
        return;
    };
    if let Some(Err(error)) = fleetgate_admin::fuzzing::body(route, body) {
        // Whatever is wrong with a body is the client's error, never the server's.
        assert!(error.status().is_client_error(), "{error:?}");
    }
});
