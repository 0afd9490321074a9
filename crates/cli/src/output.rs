//! Human and `--json` output of requests.

use coatcheck_core::Request;

/// Prints a request: one JSON document with `json`, else a short summary.
pub fn request(req: &Request, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(req).unwrap_or_default());
        return;
    }
    println!("id:          {}", req.id);
    println!("queue:       {}", req.queue);
    println!("status:      {}", req.status);
    if let Some(c) = &req.correlation_id {
        println!("correlation: {c}");
    }
    println!("attempts:    {}/{}", req.attempts, req.max_attempts);
    println!("created:     {}", req.created_at.to_rfc3339());
    if let Some(p) = &req.progress {
        println!("progress:    {}", p.get());
    }
    if req.cancel_requested && !req.status.is_terminal() {
        println!("cancel:      requested");
    }
    if let Some(f) = req.finished_at {
        println!("finished:    {}", f.to_rfc3339());
    }
    if let Some(o) = &req.output {
        println!("output:      {}", o.get());
    }
    if let Some(e) = &req.error {
        let code = e
            .code
            .as_deref()
            .map(|c| format!("[{c}] "))
            .unwrap_or_default();
        println!("error:       {code}{}", e.message);
    }
}

/// Prints what a finished `wait` has to say: the output on success (as JSON
/// text), the error otherwise (to stderr).
pub fn outcome(req: &Request, json: bool) {
    if json {
        request(req, true);
        return;
    }
    match (&req.output, &req.error) {
        (Some(o), _) if req.status == coatcheck_core::Status::Succeeded => println!("{}", o.get()),
        (_, Some(e)) => eprintln!("{}: {}", req.status, e.message),
        _ => eprintln!("{}", req.status),
    }
}
