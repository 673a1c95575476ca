// Loads each workflow as the template browser does and sends the page's own prompt (graphToPrompt) to POST /prompt,
// as Queue does; returns the server's verdict per workflow name. An accepted prompt is taken off the queue (and
// interrupted if it started), so a check never leaves work running. All in one page: a page load is most of a
// check's time (about 5 s of ComfyUI's ~490 front-end requests).
module.exports = async (page, { workflows }) => {
  return await page.evaluate(async (workflows) => {
    const app = window.app;
    const verdicts = {};
    for (const [name, workflow] of Object.entries(workflows)) {
      await app.loadGraphData(workflow, true, true, name);
      await new Promise((r) => setTimeout(r, 500));
      const { output } = await app.graphToPrompt();
      const res = await fetch("/prompt", { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify({ prompt: output, client_id: "validate" }) });
      const body = await res.json();
      if (res.ok) {
        await fetch("/queue", { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify({ delete: [body.prompt_id] }) });
        await fetch("/interrupt", { method: "POST", headers: { "Content-Type": "application/json" },
                                    body: JSON.stringify({ prompt_id: body.prompt_id }) });
        for (let k = 0; k < 600; k++) {
          const q = await (await fetch("/queue")).json();
          if (!q.queue_running.length && !q.queue_pending.length) break;
          await new Promise((r) => setTimeout(r, 500));
        }
      }
      verdicts[name] = { status: res.status, body };
    }
    return verdicts;
  }, workflows);
};
